"""``python -m launch.run``: kept for manifests written before the container entry point was
installed as ``ftrain-run`` (ftrain/launcher.py); it is the same program."""

from ftrain.launcher import cli

if __name__ == "__main__":
    cli()
