"""fedkernels as a Flower App: the ServerApp and ClientApp come from `fedkernels.flower`."""
