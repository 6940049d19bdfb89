"""`python -m vittle_fast.train` / `torchrun ... -m vittle_fast.train`: see --help."""

from .trainer import main

if __name__ == "__main__":
    main()
