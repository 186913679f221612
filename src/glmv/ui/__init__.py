"""The web app (glmv ui)."""
