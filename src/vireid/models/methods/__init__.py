"""Method models; each module registers itself with ``vireid.models.registry.register_method``."""
