"""Recovery of lost stages: who rebuilds what, from whom, by which method (pure planning), and the math."""
