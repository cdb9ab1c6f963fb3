"""Volumes under a root as an operator sees them: create, attach, inspect, snapshot, replicas
(``manage``), ``mount``/``umount`` with format-at-most-once (``mount``), registered backing
images (``images``) and what a DR standby leaves in its volume's directory (``standby``)."""
