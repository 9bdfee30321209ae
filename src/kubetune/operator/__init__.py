"""The FineTuneJob operator (Kopf): pure builders of child objects, a level-based reconcile, thin handlers."""
