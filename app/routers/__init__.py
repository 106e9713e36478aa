"""HTTP routes: the codec endpoints under /v1 and the operational ones."""
