"""Pure ASGI middleware, one concern per module (no BaseHTTPMiddleware: it costs a task per request)."""
