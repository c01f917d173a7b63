"""JSON API: the HTTP edge (routing, the error table) and one module per API."""
