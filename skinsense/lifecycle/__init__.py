"""A trained model's way to the app: handed back from the machine that trained it (handoff),
registered, promoted against the champion or rolled back (registry)."""
