output "initial_peers" {
  description = "The bootstrap multiaddr (SWARM_INITIAL_PEERS; swarm-node status --initial-peers)"
  value       = local.initial_peers
}

output "instance_group" {
  description = "Name of the spot managed instance group (scale it with swarm_size)"
  value       = google_compute_region_instance_group_manager.nodes.name
}
