"""First-party dynaudit family plugins, registered through the ``dynaudit.plugins``
entry-point group exactly like third-party ones."""
