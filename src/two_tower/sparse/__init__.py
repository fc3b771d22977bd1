"""Row-sparse embedding tables and the optimizers and steps that update them."""
