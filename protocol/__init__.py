"""What the control plane and the appliance share: wire types, signing, error tree. Pure, no I/O."""
