"""Who holds what: identifiers, tokens, manifests, controllers and federation routing."""
