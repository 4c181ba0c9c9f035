"""The commands besides ``run``: ``compare``, ``analyze`` and ``bench``."""
