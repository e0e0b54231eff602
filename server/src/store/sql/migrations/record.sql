INSERT INTO aiki_migrations (version, name) VALUES ($1, $2)
