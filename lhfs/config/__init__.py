"""A volume's durable record under a root (``volume``): its configuration, where its replicas
live, the filesystem record, and the runtime files of its engine. Both the engine and volume
management read and change it; it knows neither."""
