from gogepo_ray.cli import main

raise SystemExit(main())
