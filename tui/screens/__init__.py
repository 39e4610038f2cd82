"""The app's screens: overview, one instance, and modal dialogs."""
