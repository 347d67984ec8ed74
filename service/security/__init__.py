"""Who may call, over what: TLS (with client certificates), bearer tokens naming tenants, and the
interceptor that enforces them before any handler runs."""
