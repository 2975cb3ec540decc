"""Code both images ship: the training job's and the service's. It imports
neither `job` nor `serve` (the service image carries no `job`)."""
