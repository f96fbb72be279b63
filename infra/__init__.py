"""How the services start: the local stack (`infra.stack`: moto S3, MLflow server, Prefect server
on 127.0.0.1) and the production templates (docker compose, Prefect work-pool job templates)."""
