"""livekit-agents integration of the avatar-stack GPU service: `AvatarSession` puts its avatar in the agent's room."""

from avatar_stack_livekit.avatar import AvatarSession, AvatarStackError

__all__ = ["AvatarSession", "AvatarStackError"]
__version__ = "0.1.0"
