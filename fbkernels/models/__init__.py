"""The models: the Feedback U-Net family (fbkernels.models.unet, .feedback) and the CBL-CNN with its backbones
(fbkernels.models.cbl); docs/experiments.md says which paper each reproduces."""
from .cbl import CBLCNN, ContextualLoops, SmallCNN, StandardCNN
from .feedback import DecayMatrix, FeedbackLoop, state_changes
from .unet import FeedbackUNet, FeedforwardUNet, UNet
