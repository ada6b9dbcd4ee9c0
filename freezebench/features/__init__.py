"""Optional trainer features, each in its own module: the frozen-prefix cache, sparse training, data sieving."""
