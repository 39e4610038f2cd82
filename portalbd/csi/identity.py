"""The Identity service: who we are, what we offer, whether we are ready."""

from __future__ import annotations

from typing import Any

from portalbd import __version__
from portalbd.csi.common import DRIVER_NAME, rpc
from portalbd.csi.proto import csi_pb2 as pb
from portalbd.csi.proto import csi_pb2_grpc as pb_grpc


class IdentityService(pb_grpc.IdentityServicer):
    def __init__(self, *, controller: bool) -> None:
        self.controller = controller

    @rpc
    async def GetPluginInfo(self, request: Any, context: Any) -> Any:
        return pb.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=__version__)

    @rpc
    async def GetPluginCapabilities(self, request: Any, context: Any) -> Any:
        caps = []
        if self.controller:
            caps.append(
                pb.PluginCapability(
                    service=pb.PluginCapability.Service(
                        type=pb.PluginCapability.Service.CONTROLLER_SERVICE
                    )
                )
            )
        # Staged volumes grow too: NodeExpandVolume restarts the daemon with the
        # new size under the nbdfuse proxy (csi/attach.py).
        caps.append(
            pb.PluginCapability(
                volume_expansion=pb.PluginCapability.VolumeExpansion(
                    type=pb.PluginCapability.VolumeExpansion.ONLINE
                )
            )
        )
        return pb.GetPluginCapabilitiesResponse(capabilities=caps)

    @rpc
    async def Probe(self, request: Any, context: Any) -> Any:
        response = pb.ProbeResponse()
        response.ready.value = True
        return response
