"""Ray Job entrypoint for the retrieve stage: python -m jobs.retrieve PIPELINE.yaml"""

from jobs._entry import main

if __name__ == "__main__":
    main("retrieve")
