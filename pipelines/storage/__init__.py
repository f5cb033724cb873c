"""What jobs read and write: training data and `data prepare` (`data`), output folders at user paths (`outputs`), Ray's run storage (`ray_storage`)."""
