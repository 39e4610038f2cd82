"""`python -m portalbd.guest`: build (or find in the cache) the guest and say where it is."""

from portalbd.guest.build import main

main()
