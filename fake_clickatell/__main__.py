from fake_clickatell import main

raise SystemExit(main())
