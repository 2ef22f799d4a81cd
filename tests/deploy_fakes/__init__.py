"""Stand-ins for ``gcloud`` and ``docker`` and a small Cloud Build runner, for testing the
deployment files (tests/test_deploy.py) where no Docker engine or Google Cloud account exists.
"""
