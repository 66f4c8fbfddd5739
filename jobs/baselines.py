"""Ray Job entrypoint for the baselines stage: python -m jobs.baselines PIPELINE.yaml"""

from jobs._entry import main

if __name__ == "__main__":
    main("baselines")
