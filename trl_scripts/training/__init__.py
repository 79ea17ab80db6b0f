"""Training Uni-MoE: presets, upcycling, data and collator, the progressive stages, the Trainer subclass, the routing
and loss pictures (`plots`) and the `unimoe-train` command line (`train`).

Importing this package imports none of its modules (see `trl_scripts/__init__.py`)."""
