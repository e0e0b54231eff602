SELECT version FROM aiki_migrations
