"""Ray Job entrypoint for the transform stage: python -m jobs.transform PIPELINE.yaml"""

from jobs._entry import main

if __name__ == "__main__":
    main("transform")
