"""Ray Serve applications: the teacher (and the retriever and the student)."""
