"""ClickHouse: the client factory and the versioned schema (SQL kept in ``*.sql`` files)."""
