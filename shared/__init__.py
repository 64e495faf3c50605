"""Code both sides import: settings, schemas, the job registry and the stores."""
