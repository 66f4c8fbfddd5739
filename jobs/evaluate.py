"""Ray Job entrypoint for the evaluate stage: python -m jobs.evaluate PIPELINE.yaml"""

from jobs._entry import main

if __name__ == "__main__":
    main("evaluate")
