"""What a user trains with: the LightningModule (:mod:`.module`), the throughput callback
(:mod:`.callbacks`) and sampling (:mod:`.generate`)."""
