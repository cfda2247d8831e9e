"""The teacher's activation caches (host memory and disk: ``store``; GPU memory: ``device``) and the choice
between them (``choice``)."""
