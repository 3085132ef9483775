"""ROS 2 launch file for the mean-nav node.

    ros2 launch ros_launch/mean_nav.launch.py [params:=/path/to/mean_nav_params.yaml] [python:=/opt/mean-nav/.venv/bin/python]

The node is a plain script (no colcon package needed); it runs with the Python that has
mean-nav installed and the ROS 2 environment sourced.
"""
from pathlib import Path

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess
from launch.substitutions import LaunchConfiguration

HERE = Path(__file__).resolve().parent


def generate_launch_description():
    params = LaunchConfiguration("params")
    python = LaunchConfiguration("python")
    return LaunchDescription([
        DeclareLaunchArgument("params", default_value=str(HERE / "mean_nav_params.yaml"),
                              description="parameter YAML for the mean_nav node"),
        DeclareLaunchArgument("python", default_value="python3",
                              description="Python interpreter with mean-nav installed"),
        ExecuteProcess(
            cmd=[python, str(HERE / "mean_nav_node.py"), "--ros-args", "-r", "__node:=mean_nav",
                 "--params-file", params],
            name="mean_nav", output="screen", sigterm_timeout="10"),
    ])
