from localmoe.cli import main

raise SystemExit(main())
