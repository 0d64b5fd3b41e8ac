"""sms-receiver: an SMS paging receiver for Alertmanager and Grafana, sending through Clickatell."""

__version__ = "0.1.0"
