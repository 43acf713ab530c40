"""CLI command groups. Each module defines ``register(app)``; ``actsparse.cli`` registers them all."""
