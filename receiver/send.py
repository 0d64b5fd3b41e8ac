"""The seed's ``/send`` API, item by item: a validated item → the message to store, or the
reason it is refused (the 422 of that item). Shared by ``POST /send`` and ``sms-receiver render
--send`` so that the preview is exactly what the endpoint would store.

An item is one of:

- ``{"groupId", "message"}``: the text as written; with ``variables`` too, the message's seed
  ``{name}`` placeholders are filled from them first.
- ``{"groupId", "useTemplate": true, "variables"}``: the group's ``send_template`` (or the item's
  ``template``), a ``send_templates`` entry. Alert templates (``templates:``) are never used for
  ``/send``: without alerts they would page ``[WARNING] FIRING 0:``.

A variable the text needs and the item lacks (or gives as null) refuses the item, naming it:
never a half-empty SMS. Extra variables are fine.
"""

from __future__ import annotations

from dataclasses import replace

from receiver.ingest import InvalidPayload, SendItem
from receiver.models import NewMessage
from receiver.pipeline import Snapshot, plan_send
from receiver.render import MissingVariable, RenderBudgetExceeded, render_seed, send_context


def _names(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names)


def plan_item(item: SendItem | InvalidPayload, snap: Snapshot, now: float, message_id: str) -> NewMessage | str:
    """The message ``item`` becomes at ``now`` (its paging policy applied), or why it is refused."""
    if isinstance(item, InvalidPayload):
        return item.reason
    cfg = snap.config
    group = cfg.group(item.groupId)
    if group is None:
        known = ", ".join(g.id for g in cfg.groups) or "none configured"
        return f"unknown groupId {item.groupId!r} (groups: {known})"
    rendered = error = None
    if item.useTemplate:
        name = item.template or group.send_template
        if name is None:
            return (f"group {group.id!r} has no send_template: send a \"message\", name a send template "
                    f"with \"template\", or set groups[].send_template in the config")
        template = cfg.send_templates.get(name)
        if template is None:
            known = ", ".join(sorted(cfg.send_templates)) or "none configured"
            return f"unknown send template {name!r} (send_templates: {known})"
        context = send_context(item.variables, group, cfg.group_level(group), now,
                               zone=group.timezone or cfg.timezone)
        try:
            rendered = snap.renderer.render_send(name, template, context, cfg.clickatell.max_parts)
        except MissingVariable as exc:
            return (f"send template {name!r} needs variable(s) {_names(exc.names)}, missing from "
                    f"\"variables\" (given: {_names(list(item.variables)) or 'none'})")
        text, error = rendered.sms.text, rendered.error
    elif item.variables:
        try:
            text = render_seed(item.message or "", item.variables)
        except MissingVariable as exc:
            return (f"message uses {', '.join('{' + n + '}' for n in exc.names)}, missing from \"variables\" "
                    f"(given: {_names(list(item.variables))})")
        except RenderBudgetExceeded as exc:
            return f"message: {exc}"
    else:
        text = item.message or ""
    if not text.strip():
        return "the text is empty once its variables are filled in"
    message = plan_send(group.id, text, snap, now, message_id)
    if rendered is not None:  # as rendered: fit() knows whether it cut the text
        message = replace(message, sms=rendered.sms, template_error=error)
    return message
