from switchgear.cli import main

raise SystemExit(main())
