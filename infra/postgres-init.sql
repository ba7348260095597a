-- Run by the postgres image once, when its volume is new (docker-compose.yml): the databases
-- besides mlflow (POSTGRES_DB). Owner: POSTGRES_USER.
CREATE DATABASE prefect;  -- Prefect's server: flow runs, deployments, work pools
CREATE DATABASE optuna;   -- Optuna studies of `lensflow tune` (LENSFLOW_TUNE_STORAGE)
CREATE DATABASE mlflow_auth;  -- MLflow's accounts and permissions (infra/mlflow-auth.ini)
