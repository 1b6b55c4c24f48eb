"""The MLflow model registry client, parent process only: resolve, download, verify, author."""
