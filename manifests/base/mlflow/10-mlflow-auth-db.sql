-- Runs once, when Postgres initialises an empty data directory, as the POSTGRES_USER (mlflow).
-- The tracking store lives in POSTGRES_DB (mlflow); MLflow's basic-auth app keeps its users and
-- permissions in a database of its own.
CREATE DATABASE mlflow_auth;
