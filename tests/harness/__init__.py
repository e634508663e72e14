"""The test harness: what tests and ``launch.chaos`` share (storage that is slow or held on
purpose, ...). Nothing here is imported by the ftrain package."""
