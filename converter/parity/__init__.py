"""The parity suite: both codebases on identical inputs."""
